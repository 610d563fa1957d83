"""Data: dataset converters, shards, object storage and the streaming reader."""
