"""Guest-supplied firmware: `addon` (UKI add-ons, .efifw/.hwids) and `image`
(OVMF/IGVM recognition, SNP checks). Import the submodules; this package
imports nothing so that `image` does not pull in pefile."""
