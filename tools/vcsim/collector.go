package main

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// waitCollector replaces vcsim's PropertyCollector (only with -task-delay, where clients
// really wait for tasks) to fix two vcsim 0.24 problems of WaitForUpdates(Ex):
//
//   - A collector gets updates through a Registry handler keyed by its moref. Every session's
//     instance of the root collector has the moref "PropertyCollector", so only the session
//     that started waiting last got updates; the others (pyVim's WaitForTask) waited forever.
//     Each session's root collector now listens under a moref of its own.
//   - The first call (version "") collected the current state and only then registered the
//     handler: a change in between was lost. The handler is now registered before.
//
// vcsim creates the per-session root collectors with reflect.New of the singleton's type and
// CreatePropertyCollector is overridden, so every collector a client uses is a waitCollector.
type waitCollector struct {
	simulator.PropertyCollector // first: leads to mo.PropertyCollector

	listenMu  sync.Mutex
	listening bool
}

var waitCollectorSeq int64

// rootCollectors: per-session root collectors that listen, by session key (for Logout).
var rootCollectors = struct {
	sync.Mutex
	bySession map[string][]*waitCollector
}{bySession: map[string][]*waitCollector{}}

func installWaitCollector() {
	si := simulator.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance)
	pc := &waitCollector{}
	pc.Self = si.Content.PropertyCollector
	simulator.Map.Put(pc)
}

func (pc *waitCollector) listen(ctx *simulator.Context) {
	pc.listenMu.Lock()
	defer pc.listenMu.Unlock()
	if pc.listening {
		return
	}
	pc.listening = true
	if root := ctx.Map.Get(vim25.ServiceInstance).(*simulator.ServiceInstance).Content.PropertyCollector; pc.Self == root {
		pc.Self.Value = fmt.Sprintf("%s-session-%d", root.Value, atomic.AddInt64(&waitCollectorSeq, 1))
		if ctx.Session != nil {
			rootCollectors.Lock()
			rootCollectors.bySession[ctx.Session.Key] = append(rootCollectors.bySession[ctx.Session.Key], pc)
			rootCollectors.Unlock()
		}
	}
	ctx.Map.AddHandler(&pc.PropertyCollector)
}

func (pc *waitCollector) WaitForUpdatesEx(ctx *simulator.Context, r *types.WaitForUpdatesEx) soap.HasFault {
	pc.listen(ctx)
	return pc.PropertyCollector.WaitForUpdatesEx(ctx, r)
}

func (pc *waitCollector) WaitForUpdates(ctx *simulator.Context, r *types.WaitForUpdates) soap.HasFault {
	pc.listen(ctx)
	return pc.PropertyCollector.WaitForUpdates(ctx, r)
}

func (pc *waitCollector) CreatePropertyCollector(ctx *simulator.Context, c *types.CreatePropertyCollector) soap.HasFault {
	cpc := &waitCollector{}
	cpc.Self.Type = "PropertyCollector" // Session.Put would use the Go type name
	return &methods.CreatePropertyCollectorBody{
		Res: &types.CreatePropertyCollectorResponse{Returnval: ctx.Session.Put(cpc).Reference()},
	}
}

// forgetSessionCollectors stops the root collector(s) of a logged-out session from listening
// (vcsim's Logout leaves the root collector's handler registered).
func forgetSessionCollectors(sessionKey string) {
	rootCollectors.Lock()
	pcs := rootCollectors.bySession[sessionKey]
	delete(rootCollectors.bySession, sessionKey)
	rootCollectors.Unlock()
	for _, pc := range pcs {
		simulator.Map.RemoveHandler(&pc.PropertyCollector)
	}
}
