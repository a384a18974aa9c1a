"""Test helper: fail when a compiled step fell back to torch.compile or eager (the engine warns
instead of raising, so without this a broken compile would pass as a slower eager run)."""

import warnings


class no_compile_fallback:
    """Context manager: fails the test if any "compiling ..." warning was given inside it."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        fallbacks = [str(w.message) for w in self._records if str(w.message).startswith("compiling ")]
        assert not fallbacks, fallbacks
