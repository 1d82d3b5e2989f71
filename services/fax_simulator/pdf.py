"""A small valid PDF written by hand: one US Letter page per page asked for, lines of Helvetica text
on each (a real text layer: a PDF reader, pypdf's `extract_text()` or cloud-comms' triage read the
lines back). Enough for cloud-comms' checks too (header, end marker).

The sample is the one-page referral every helper and demo uses (fictional data: the demo roster's
Maria Lopez at Riverbend)."""

from __future__ import annotations

SAMPLE_LINES = (
    "REFERRAL FOR CONSULTATION",
    "Patient: Maria Lopez",
    "DOB: 03/12/1984",
    "MRN: RB100234",
    "Reason for referral: anxiety and poor sleep; please schedule an intake.",
)
SAMPLE_TEXT = "\n".join(SAMPLE_LINES)
FONT_SIZE = 12
LEADING = 16


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _page_stream(lines: list[str]) -> bytes:
    """Text drawn from the top left, one line under the other (T* moves down by the leading)."""
    shown = " T* ".join(f"({_escape(line)}) Tj" for line in lines)
    return f"BT /F1 {FONT_SIZE} Tf {LEADING} TL 72 720 Td {shown} ET".encode("latin-1")


def sample_pdf(pages: int = 1, text: str = SAMPLE_TEXT) -> bytes:
    """A PDF of `pages` pages (at least 1), each showing the lines of `text` and its page number."""
    pages = max(1, pages)
    lines = [line.encode("latin-1", "replace").decode("latin-1") for line in text.splitlines() or [""]]
    return text_pdf(*([*lines, "", f"Page {i + 1} of {pages}"] for i in range(pages)))


def text_pdf(*pages: list[str]) -> bytes:
    """A PDF 1.4 with one US Letter page per list of lines (at least one page), each line drawn in
    Helvetica (latin-1 text)."""
    pages = pages or ([""],)
    font_obj = 3
    first_page = 4  # page i: object first_page + 2i, its content stream the next one
    kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, lines in enumerate(pages):
        stream = _page_stream(list(lines))
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font_obj} 0 R >> >>"
            f" /Contents {first_page + 2 * i + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
