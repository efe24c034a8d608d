"""What a platform team installs on Kubernetes: values → manifests (deploy/).

``values`` decodes deploy/values.yaml, ``manifests`` builds the objects, ``crds`` derives
the policy CRDs from the resource structs, ``render`` writes deploy/manifests/, and
``cniconf`` is the CNI network configuration the node executor installs. All pure
except ``render.write``.
"""
