"""Embedded infrastructure (Tansu broker, SeaweedFS S3) and child-process helpers."""
