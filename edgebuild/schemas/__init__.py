"""JSON Schemas of the files edgebuild publishes (report.json)."""
