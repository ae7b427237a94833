from setuptools import Extension, setup

# The C recorder backend; optional so that a machine without a compiler still installs
# (llmtrace.recorder falls back to the pure-Python one).
# The frame reader the stack sampler uses to sample without the GIL; optional likewise (the
# sampler then reads stacks under the GIL).
setup(
    ext_modules=[
        Extension("llmtrace._fastspan", ["llmtrace/_fastspan.c"], optional=True, extra_compile_args=["-O2"]),
        Extension("llmtrace._frames", ["llmtrace/_frames.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
