"""The UI server: one web page that shows and drives the fleet, the versions, the runs and a playground."""
