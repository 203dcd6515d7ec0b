"""The kdgate stack without Docker: gateway, teacher, Prometheus, Alertmanager, receiver."""
