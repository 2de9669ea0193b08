"""Reports: markdown leaderboards from a results directory."""
