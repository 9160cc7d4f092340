"""What a failed command-line run prints (bundle.cli): the bundle's own message as the last line, exit code 1."""

import io

from bundle import cli


def _wrapped(error: Exception) -> RuntimeError:
    """``error`` as MONAI's config evaluation wraps it, twice."""
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression: ...") from inner
    except RuntimeError as outer:
        try:
            raise RuntimeError("Failed to instantiate ...") from outer
        except RuntimeError as top:
            return top


def test_the_root_cause_is_the_last_line_and_the_traceback_is_behind_the_debug_flag(monkeypatch):
    error = _wrapped(FileNotFoundError("scan.nii.gz: no such file or directory"))
    stream = io.StringIO()
    monkeypatch.delenv(cli.DEBUG_VARIABLE, raising=False)
    assert cli.report(error, stream) == 1
    lines = stream.getvalue().splitlines()
    assert lines == ["(the traceback is shown with SAM_UNET_DEBUG=1)", "error: scan.nii.gz: no such file or directory"]
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    stream = io.StringIO()
    cli.report(error, stream)
    text = stream.getvalue()
    assert "Traceback" in text and "Failed to evaluate" in text
    assert text.splitlines()[-1] == "error: scan.nii.gz: no such file or directory"


def test_internal_errors_say_so_and_key_errors_lose_their_quotes():
    assert cli.error_message(_wrapped(KeyError("label"))) == "label"
    message = cli.error_message(_wrapped(ZeroDivisionError("division by zero")))
    assert message.startswith("ZeroDivisionError: division by zero (an internal error")
    assert cli.run_main(lambda: 0) == 0
    assert cli.run_main(lambda: (_ for _ in ()).throw(ValueError("bad value"))) == 1
