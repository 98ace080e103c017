"""Templates edgebuild renders (reports, Android and iOS packaging); installed as `edgebuild_templates`."""
