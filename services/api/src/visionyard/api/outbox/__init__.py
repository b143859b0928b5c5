"""The transactional outbox: rows written with a state change (`repository`), published after commit (`relay`)."""
