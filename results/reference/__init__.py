"""Published numbers of the Convpass paper, as CSV files (data only; see README.md)."""
