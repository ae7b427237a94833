from setuptools import Extension, setup

# The C recorder backend; optional so that a machine without a compiler still installs
# (llmtrace.recorder falls back to the pure-Python one).
setup(
    ext_modules=[Extension("llmtrace._fastspan", ["llmtrace/_fastspan.c"], optional=True, extra_compile_args=["-O2"])]
)
