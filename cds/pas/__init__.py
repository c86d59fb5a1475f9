"""Da Vinci PAS 2.2.1: the prior-authorization request (Claim/$submit, $inquire), its review and notifications."""
