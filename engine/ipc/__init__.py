"""Transport between the master and its agents: TCP frames (`tcp`) and shared-memory
arenas (`shm`). The spans around them use llmtrace's public API only (`span(start_ns=,
follows=)`, `record_span`)."""
