-- The Prefect database is POSTGRES_DB; MLflow gets its own.
CREATE DATABASE mlflow;
