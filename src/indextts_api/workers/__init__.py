"""Worker roles: TTS synthesis (task topic → result topic) and upload (result topic → S3 → webhook)."""
