"""eFax for cloud-comms: faxes received at an agency's fax number reach the linked staff's boards.

The provider (Phaxio, API v2) calls `POST /api/v1/fax/callbacks/received` with the fax and its PDF;
the callback is signed (X-Phaxio-Signature, see `phaxio.py`), the PDF is stored sealed per agency
and its board delivery is staged in the same write (`feature.py`). README.md has the details.
"""
