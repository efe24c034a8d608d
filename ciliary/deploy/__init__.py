"""What a platform team installs on Kubernetes: values → manifests (deploy/).

``values`` decodes deploy/values.yaml, ``manifests`` builds the objects, ``crds`` derives
the policy CRDs from the resource structs, ``render`` writes deploy/manifests/, and
``credentials`` names the NATS users of an installation and the Secrets that carry their
credentials. All pure except ``render.write``. Two entry points run inside the pods:
``credinstall`` (the init container installing a pod's credential, mode 0600) and
``provision`` (the Job creating the buckets as ``admin``).
"""
