"""Fax PDFs at rest, received and sent alike: sealed with the agency's key in pieces.

A fax may be 20 MiB, more than fits a MongoDB document (16 MiB) once base64-encoded and sealed, so
the PDF is cut into pieces of 3 MiB, each sealed on its own (kit PhiCipher, AAD = agency | piece id
| "pdf", so a piece cannot be swapped into another fax or position) in `fax_chunks`:
`{_id: "<owner id>_<n>", fax_id: <owner id>, agency_id, n, data}`. The owner is a received fax
(`fax_...`) or a sent one (`fxo_...`). Pieces are written before the owner's document, with
upserts, so a retried write after a crash overwrites what a first try left.
"""

from __future__ import annotations

import base64

from pymongo.collection import Collection

from services.kit.crypto import DecryptionError, PhiCipher
from services.kit.errors import Unavailable
from services.kit.mongo import IndexSpec

FAX_CHUNKS = "fax_chunks"
# PDF bytes per sealed piece: base64 (x4/3) plus the envelope stay far below MongoDB's 16 MiB.
CHUNK_BYTES = 3 * 1024 * 1024
INDEXES = [IndexSpec(FAX_CHUNKS, [("fax_id", 1), ("n", 1)], name="fax_chunks_by_fax")]


class SealedPdfs:
    """put() and get() of one owner's PDF in `fax_chunks`."""

    def __init__(self, chunks: Collection, cipher: PhiCipher):
        self.chunks = chunks
        self.cipher = cipher

    def put(self, agency_id: str, owner_id: str, pdf: bytes) -> int:
        """Seal and store `pdf` for `owner_id`; the number of pieces (for get())."""
        pieces = [pdf[start : start + CHUNK_BYTES] for start in range(0, len(pdf), CHUNK_BYTES)]
        for n, piece in enumerate(pieces):
            chunk_id = f"{owner_id}_{n}"
            sealed = self.cipher.seal(agency_id, chunk_id, "pdf", base64.b64encode(piece).decode("ascii"))
            # $set, not replace_one: nx-27017 refuses a replacement holding bytes of a document that
            # exists (a provider's retry after a crash between the pieces and the fax document).
            self.chunks.update_one(
                {"_id": chunk_id},
                {"$set": {"fax_id": owner_id, "agency_id": agency_id, "n": n, "data": sealed}},
                upsert=True,
            )
        return len(pieces)

    def delete(self, owner_id: str) -> None:
        """Remove the pieces of `owner_id` (a PDF written for a document that was never stored)."""
        self.chunks.delete_many({"fax_id": {"$eq": owner_id}})

    def get(self, agency_id: str, owner_id: str, expected_pieces: int) -> bytes:
        """The PDF of `owner_id`; Unavailable `unreadable` when a piece is missing or does not open."""
        pieces = list(self.chunks.find({"fax_id": {"$eq": owner_id}}).sort("n", 1))
        if len(pieces) != expected_pieces:
            raise Unavailable("unreadable", "the fax cannot be opened")
        try:
            return b"".join(
                base64.b64decode(self.cipher.open(agency_id, piece["_id"], "pdf", piece["data"])) for piece in pieces
            )
        except DecryptionError as exc:
            raise Unavailable("unreadable", "the fax cannot be opened") from exc
