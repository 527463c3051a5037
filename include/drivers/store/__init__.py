"""Storage: object storage over google-cloud-storage and what lives there (pushes,
claims, the ledger, run-time config), plus the embedded GCS emulator."""
