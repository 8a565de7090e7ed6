// argocd-health: Argo CD's way of running a resource health script, for the tests of
// examples/argocd.
module eden.io/argocd-health

go 1.24.0

require github.com/yuin/gopher-lua v1.1.1
