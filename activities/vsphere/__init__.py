"""vSphere access: sessions, inventory reads, task waits and fault classification."""
