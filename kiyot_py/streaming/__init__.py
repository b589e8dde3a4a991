"""The streaming server the kubelet is pointed at for exec, attach and port-forward."""
