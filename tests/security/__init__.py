"""The adversarial suite (issue 12, item 8): schemas and shared-file readers under property-based tests,
the three OpenAPI specs under schemathesis, and each attack of the issue as a regression test."""
