"""The build pipeline: load -> convert -> compress -> evaluate -> select -> package -> report."""
