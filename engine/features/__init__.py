"""Feature extraction: music (Table I statistics) and video (CNN frame features)."""


class MediaError(ValueError):
    """A media file cannot be used: unreadable, without the needed stream, or silent."""
