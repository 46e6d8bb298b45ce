"""Generated API code."""
