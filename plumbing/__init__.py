"""Temporal plumbing every process shares: settings, the data converter, connecting, and
sending Updates. Imports only `domain`; workers, activities, the SDK client and the CLI
import it (workflows never do: they run in the sandbox and reach Temporal through the SDK)."""
