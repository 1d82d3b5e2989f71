"""ePrescribing vendors, one module each, behind `base.VendorAdapter`."""
