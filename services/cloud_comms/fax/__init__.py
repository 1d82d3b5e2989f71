"""eFax for cloud-comms: faxes received at an agency's fax number reach the linked staff's boards,
and staff send faxes from the board (Send Fax).

The provider (Phaxio, API v2) calls `POST /api/v1/fax/callbacks/received` with the fax and its PDF;
the callback is signed (X-Phaxio-Signature, see `phaxio.py`), the PDF is stored sealed per agency
and its board delivery is staged in the same write (`feature.py`). A fax sent from the board is
stored the same way (`outbound.py`), handed to the provider by the `fax-sender` worker
(`sender.py`) and followed through the provider's signed status callbacks
(`POST /api/v1/fax/callbacks/status`). README.md has the details.
"""
