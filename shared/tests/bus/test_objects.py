"""Reading staged objects chunk by chunk (`Bus.read_object`) against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
from pathlib import Path

import pytest
from nats.js import api
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_STREAM_TEMPLATE

from visionyard.shared import streams
from visionyard.shared.bus import Bus, PermanentError, TransientError
from visionyard.shared.bus import objects as bus_module

pytestmark = pytest.mark.integration

STAGING_STREAM = OBJ_STREAM_TEMPLATE.format(bucket=streams.OBJECT_STAGING)


async def put_in_small_chunks(bus: Bus, name: str, data: bytes, *, chunk: int = 4096) -> str:
    """Stage `data` in many small chunks (as an older client would); its hex sha256."""
    store = await bus.object_store()
    meta = api.ObjectMeta(name=name, options=api.ObjectMetaOptions(max_chunk_size=chunk))
    await store.put(name, io.BytesIO(data), meta=meta)
    return hashlib.sha256(data).hexdigest()


async def read_all(bus: Bus, name: str, *, sha256: str | None = None) -> list[bytes]:
    chunks: list[bytes] = []
    async with contextlib.aclosing(bus.read_object(name, sha256=sha256)) as reader:
        async for chunk in reader:
            chunks.append(chunk)
    return chunks


async def consumers_on_staging(bus: Bus) -> int:
    return (await bus.js.stream_info(STAGING_STREAM)).state.consumer_count


async def reader_waiting(bus: Bus) -> None:
    """Until a reader's consumer on the staging stream has a pull request waiting on the server."""
    for _ in range(600):  # 30 s at most
        if any(info.num_waiting for info in await bus.js.consumers_info(STAGING_STREAM)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("no reader is waiting for chunks")


async def test_chunks_arrive_in_order_across_many_pulls_and_the_reader_leaves_no_consumer(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "OBJECT_READ_WINDOW", 10 * 4096)  # 10 chunks per pull
    data = os.urandom(300_000)  # 74 chunks of 4 KiB: 8 pulls
    sha = await put_in_small_chunks(bus, "t/many", data)
    chunks = await read_all(bus, "t/many", sha256=sha)
    assert b"".join(chunks) == data and len(chunks) == 74
    assert await read_all(bus, "t/many") == chunks  # verified against the recorded digest
    assert await consumers_on_staging(bus) == 0


async def test_wrong_sha256_fails_only_after_the_last_chunk(bus: Bus) -> None:
    data = os.urandom(50_000)
    await put_in_small_chunks(bus, "t/bad", data)
    seen: list[bytes] = []
    with pytest.raises(PermanentError, match="sha256"):
        async with contextlib.aclosing(bus.read_object("t/bad", sha256="0" * 64)) as reader:
            async for chunk in reader:
                seen.append(chunk)
    # Every byte went by before the error: a consumer that commits only after the loop never commits.
    assert b"".join(seen) == data
    assert await consumers_on_staging(bus) == 0


async def test_a_reader_stopped_early_removes_its_consumer(bus: Bus) -> None:
    await put_in_small_chunks(bus, "t/early", os.urandom(100_000))
    async with contextlib.aclosing(bus.read_object("t/early")) as reader:
        async for _ in reader:
            break
    assert await consumers_on_staging(bus) == 0


async def test_missing_and_empty_objects(bus: Bus, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        await read_all(bus, "t/none")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    sha, size = await bus.put_file("t/empty", empty)
    assert size == 0 and await read_all(bus, "t/empty", sha256=sha) == []
    copy = await bus.get_file("t/empty", tmp_path / "copy.bin", sha256=sha)
    assert copy.read_bytes() == b""


async def test_get_file_of_a_multi_megabyte_object(bus: Bus, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 7))  # several 1 MiB chunks, a partial last one
    sha, _ = await bus.put_file("t/big", source)
    copy = await bus.get_file("t/big", tmp_path / "out" / "big.bin", sha256=sha)
    assert copy.read_bytes() == source.read_bytes()
    assert not (tmp_path / "out" / "big.bin.part").exists()


async def test_put_file_writes_the_object_store_layout_any_client_reads(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "OBJECT_PUT_IN_FLIGHT", 2)  # the ack window turns over several times
    source = tmp_path / "ckpt.bin"
    source.write_bytes(os.urandom(5 * 1024 * 1024 + 11))
    sha, size = await bus.put_file("t/layout", source)
    assert (sha, size) == (hashlib.sha256(source.read_bytes()).hexdigest(), source.stat().st_size)
    store = await bus.object_store()
    info = await store.get_info("t/layout")
    assert info.size == size and info.chunks == 6
    # nats-py's own reader checks the recorded digest against the chunks.
    assert (await store.get("t/layout")).data == source.read_bytes()


async def test_putting_a_name_again_drops_the_old_chunks(bus: Bus, tmp_path: Path) -> None:
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(os.urandom(200_000))
    await bus.put_file("t/again", first)
    old_id = (await (await bus.object_store()).get_info("t/again")).nuid
    sha, _ = await bus.put_file("t/again", second)
    assert b"".join(await read_all(bus, "t/again", sha256=sha)) == second.read_bytes()
    state = await bus.js.stream_info(STAGING_STREAM, subjects_filter=f"$O.{streams.OBJECT_STAGING}.C.{old_id}")
    assert not state.state.subjects


async def test_an_object_is_read_while_it_is_put(bus: Bus, tmp_path: Path) -> None:
    source = tmp_path / "incoming.bin"
    source.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    object_id = bus.new_object_id()

    async def read() -> bytes:
        chunks = []
        async with contextlib.aclosing(bus.read_incoming(object_id, source.stat().st_size)) as reader:
            async for chunk in reader:
                chunks.append(chunk)
        return b"".join(chunks)

    reading = asyncio.create_task(read())
    await reader_waiting(bus)  # the reader asks before the first chunk is put
    assert not reading.done()
    await bus.put_file("t/incoming", source, object_id=object_id)
    assert await asyncio.wait_for(reading, 10) == source.read_bytes()
    assert await consumers_on_staging(bus) == 0


async def test_reading_an_object_that_never_comes_stalls_and_cleans_up(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bus_module, "OBJECT_READ_STALL_SECONDS", 0.3)
    with pytest.raises(TransientError, match="stalled"):
        async with contextlib.aclosing(bus.read_incoming(bus.new_object_id(), 1000)) as reader:
            async for _ in reader:
                pass
    assert await consumers_on_staging(bus) == 0
