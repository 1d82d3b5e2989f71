"""cloud-comms: the agency's cloud communications edge (Direct secure messaging, eFax) onto boards."""
