"""The application layer above the flows: what a command-line session needs around a flow run (the Prefect API it
talks to, signal handling). It may import everything below it; the library (`mergeflow`) never imports it."""
