"""HTTP front end and the longserve CLI."""
