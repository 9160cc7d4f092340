"""SAM-UNet MONAI bundle: network, transforms, data, engines and inferers that the configs instantiate."""
