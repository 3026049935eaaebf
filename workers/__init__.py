"""Worker processes: the control worker and the gateway agent."""
