"""What each pipeline stage does, one module per step of the pipeline; every stage reads files and
writes files. The task graph (`edgebuild.pipeline.graph`) decides *when* a stage runs.

Stage modules import the layout, the policy, the api and small helpers, never each other.
"""
