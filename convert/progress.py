"""Progress lines for the conversion's phases: edge/model/progress.py's, with rate and ETA."""
from edge.model.progress import Progress, watch_file  # noqa: F401
