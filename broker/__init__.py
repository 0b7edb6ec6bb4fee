"""firmgate key broker (Trustee KBS protocol 0.4.0 compatible)."""
