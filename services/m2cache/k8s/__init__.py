"""Kubernetes operations for m2cache deployments (deploy/k8s). Domain code here
imports no kubernetes client; ``m2cache.commands.k8s`` does the API calls."""
