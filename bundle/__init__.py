"""SAM-UNet MONAI bundle: network, transforms, data, engines and inferers that the configs instantiate."""

from .quiet import quiet_third_party

quiet_third_party()  # before the bundle imports the libraries whose notices it hides (configs "$import bundle")
