"""The instrumented serving engine: master/agent processes, scheduler, model side.

Vocabulary follows vLLM / nano-vllm (Scheduler, BlockManager, Sequence, SamplingParams,
ModelRunner). Importing `engine` imports nothing heavy; torch is loaded by the modules
that need it.
"""
