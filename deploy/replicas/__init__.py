"""Local stand-in for a Kubernetes Service: replicas of the image behind HAProxy (python -m deploy.replicas)."""
