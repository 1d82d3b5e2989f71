import io
import json
import logging

from services.kit.logs import JsonFormatter, accept_correlation_id, correlation_id_var


def emit(**kwargs) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("inbox"))
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    exc_info = kwargs.pop("exc_info", None)
    logger.info("message sent", extra=kwargs, exc_info=exc_info)
    return json.loads(stream.getvalue())


def test_a_line_is_json_with_service_and_correlation_id():
    token = correlation_id_var.set("corr-1")
    try:
        line = emit(message_id="msg_1", event_id="evt_1")
    finally:
        correlation_id_var.reset(token)
    assert line["service"] == "inbox" and line["msg"] == "message sent"
    assert line["correlation_id"] == "corr-1" and line["event_id"] == "evt_1" and line["message_id"] == "msg_1"


def test_fields_outside_the_safe_list_are_dropped():
    line = emit(body="Client reports suicidal thoughts", subject="PHI", patient_name="Jane Roe", staff_id="stf_1")
    assert "body" not in line and "subject" not in line and "patient_name" not in line
    assert line["staff_id"] == "stf_1"


def test_exceptions_log_type_and_frames_but_not_their_text():
    try:
        raise ValueError("Jane Roe's lab value 7.2")
    except ValueError as exc:
        line = emit(exc_info=(type(exc), exc, exc.__traceback__))
    assert line["error_type"] == "ValueError"
    assert "Jane Roe" not in json.dumps(line)
    assert line["frames"]


def test_only_printable_ascii_correlation_ids_of_128_characters_are_carried():
    assert accept_correlation_id("9f1c-42#7") == "9f1c-42#7"
    for bad in (None, "", "x" * 129, "\xe9" * 128, "a\nb", "tab\there"):
        assert accept_correlation_id(bad) is None
