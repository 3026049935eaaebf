"""Everything that talks to Temporal from outside: the kubegate CLI, the client, the local stack."""
