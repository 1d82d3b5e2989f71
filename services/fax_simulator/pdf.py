"""A small valid PDF written by hand: one US Letter page per page asked for, a line of Helvetica text
on each. Enough for a PDF reader and for cloud-comms' checks (header, end marker)."""

from __future__ import annotations

SAMPLE_TEXT = "Referral for JOHN SAMPLE DOB 1970-01-01"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def sample_pdf(pages: int = 1, text: str = SAMPLE_TEXT) -> bytes:
    """A PDF of `pages` pages (at least 1), each showing `text` and its page number."""
    pages = max(1, pages)
    font_obj = 3
    first_page = 4  # page i: object first_page + 2i, its content stream the next one
    kids = " ".join(f"{first_page + 2 * i} 0 R" for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i in range(pages):
        line = _escape(f"{text} - page {i + 1} of {pages}".encode("latin-1", "replace").decode("latin-1"))
        stream = f"BT /F1 14 Tf 72 720 Td ({line}) Tj ET".encode("latin-1")
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
