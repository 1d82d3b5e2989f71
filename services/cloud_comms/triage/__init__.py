"""Automatic triage of inbound Direct messages and faxes (issue 13): suggested patient and document
type, one-click confirmation, routing by document type. See README.md in this package."""
