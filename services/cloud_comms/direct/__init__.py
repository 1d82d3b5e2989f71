"""Direct secure messaging (inbound): the agency's HISP edge (SMTP + S/MIME) onto staff boards."""
