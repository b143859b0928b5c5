"""Where storage keeps things: every bucket key and staging object name it writes, in one place.

Bucket keys (identical on S3 and on the local-directory backend, `<root>/<bucket>/<key>`):

    external bucket  datasets/<dataset_id>/<content_hash>/dataset.zip      normalized archive
                     datasets/<dataset_id>/<content_hash>/manifest.json    stats; written last
                     datasets/<dataset_id>/<content_hash>/images.json      [{filename, size}] index
                     datasets/<dataset_id>/<content_hash>/files/<path>     each image, for browsing
                     datasets/<dataset_id>/deleted.json                    tombstone of a deleted dataset
                     inference/<session_id>/<uuid><suffix>                 uploaded inference images
    internal bucket  checkpoints/<job_id>/<kind>.pt (+ <kind>.json sidecar)
                     exports/<export_id>/package.zip                       export packages
                     results/<inference_id>/results.json                   inference results

Staging object names storage hands out (runners and the API name what they stage themselves):
`dataset/<content_hash>.zip`, `resume/<job_id>/<kind>.pt`, `browse/<content_hash>/<path>`,
`object/<sha256 of bucket/key>`.

Every id that becomes a key token must be a `SAFE_ID`, every version a `CONTENT_HASH`: a key is
never built from a value that could climb out of its folder.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import PurePosixPath

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
CONTENT_HASH = re.compile(r"^[0-9a-f]{64}$")

# Only what the platform itself stores may be staged back out by URI.
STAGEABLE_PREFIXES = ("inference/", "exports/", "results/")


# -- internal bucket ------------------------------------------------------------------------------


def checkpoint_prefix(job_id: str) -> str:
    """Key prefix of a job's stored checkpoints (and their sidecars)."""
    return f"checkpoints/{job_id}/"


def checkpoint_key(job_id: str, kind: str) -> str:
    """Key of a job's stored checkpoint of one kind."""
    return f"{checkpoint_prefix(job_id)}{kind}.pt"


def checkpoint_sidecar_key(job_id: str, kind: str) -> str:
    """Key of the JSON beside a stored checkpoint (attempt, seq, sha256, size_bytes, epoch, uri)."""
    return f"{checkpoint_prefix(job_id)}{kind}.json"


def export_package_key(export_id: str) -> str:
    """Key of an export's package in the internal bucket."""
    return f"exports/{export_id}/package.zip"


def inference_results_key(inference_id: str) -> str:
    """Key of an inference job's results in the internal bucket."""
    return f"results/{inference_id}/results.json"


# -- external bucket ------------------------------------------------------------------------------


def dataset_archive_key(dataset_id: str, content_hash: str) -> str:
    """Key of a stored dataset version's normalized archive."""
    return f"datasets/{dataset_id}/{content_hash}/dataset.zip"


def dataset_manifest_key(dataset_id: str, content_hash: str) -> str:
    """Key of a stored dataset version's manifest (its stats); written last, so it marks completion."""
    return f"datasets/{dataset_id}/{content_hash}/manifest.json"


def dataset_index_key(dataset_id: str, content_hash: str) -> str:
    """Key of a stored dataset version's image index (`[{filename, size}]`, sorted by filename)."""
    return f"datasets/{dataset_id}/{content_hash}/images.json"


def dataset_file_key(dataset_id: str, content_hash: str, filename: str) -> str:
    """Key of one image of a stored dataset version, kept beside the archive for browsing."""
    return f"datasets/{dataset_id}/{content_hash}/files/{filename}"


def dataset_prefix(dataset_id: str) -> str:
    """Key prefix of every stored version of a dataset (one folder per content hash)."""
    return f"datasets/{dataset_id}/"


def dataset_version_prefix(dataset_id: str, content_hash: str) -> str:
    """Key prefix of one stored dataset version."""
    return f"datasets/{dataset_id}/{content_hash}/"


def dataset_tombstone_key(dataset_id: str) -> str:
    """Key of the marker a deleted dataset leaves, so an upload still being checked is not stored."""
    return f"datasets/{dataset_id}/deleted.json"


def inference_session_prefix(session_id: str) -> str:
    """Key prefix of one session's uploaded inference images."""
    return f"inference/{session_id}/"


def inference_image_key(session_id: str, filename: str) -> str:
    """Key of an uploaded inference image: unique within its session, keeping the suffix."""
    suffix = PurePosixPath(filename).suffix.lower()[:10]
    return f"{inference_session_prefix(session_id)}{uuid.uuid4().hex}{suffix}"


# -- staging object names -------------------------------------------------------------------------


def staged_browse_name(content_hash: str, filename: str) -> str:
    """Staging object name of one image handed to the API for browsing (too big for a NATS reply)."""
    return f"browse/{content_hash}/{filename}"


def staged_dataset_name(content_hash: str) -> str:
    """Staging object name of a dataset version handed to runners."""
    return f"dataset/{content_hash}.zip"


def staged_resume_name(job_id: str, kind: str) -> str:
    """Staging object name of a stored checkpoint handed to a resuming attempt."""
    return f"resume/{job_id}/{kind}.pt"


def staged_object_name(bucket: str, key: str) -> str:
    """Staging object name of a stored object staged by URI: concurrent requests for one object share one copy."""
    return f"object/{hashlib.sha256(f'{bucket}/{key}'.encode()).hexdigest()}"
