package main

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/ioutil"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

// What the cluster lifecycle needs from a clone and a guest that vcsim 0.24 leaves out:
//
//   - a clone to a folder that already holds a VM of that name, or to which a clone of that
//     name is still running, fails with DuplicateName (vCenter registers the target name when
//     the task starts; vcsim 0.24 makes a second VM of the same name);
//   - the clone spec's config.annotation, numCPUs and memoryMB are applied (vcsim copies only
//     extraConfig, instanceUuid and deviceChange);
//   - at power-on the guest hostname comes from guestinfo.metadata's local-hostname, as
//     cloud-init's VMware datasource would set it (see dhcpServer.poweredOn).

type cloneTarget struct {
	folder types.ManagedObjectReference
	name   string
}

// clonesInFlight: clone targets by (folder, name) -> the clone's task (nil while the call is
// being served). An entry whose task ended is stale and ignored.
var clonesInFlight = struct {
	sync.Mutex
	m map[cloneTarget]*types.ManagedObjectReference
}{m: map[cloneTarget]*types.ManagedObjectReference{}}

// claimCloneTarget registers a clone's target; it returns the object a DuplicateName fault
// names if the folder holds a VM of that name or another clone of it is running.
func claimCloneTarget(t cloneTarget) *types.ManagedObjectReference {
	clonesInFlight.Lock()
	defer clonesInFlight.Unlock()
	if task, ok := clonesInFlight.m[t]; ok {
		if task == nil || taskRunning(*task) {
			f := t.folder
			return &f
		}
		delete(clonesInFlight.m, t)
	}
	if vm := vmNamedIn(t.folder, t.name); vm != nil {
		return vm
	}
	clonesInFlight.m[t] = nil
	return nil
}

// settleCloneTarget records the clone's task (from the call's response), or drops the claim.
func settleCloneTarget(t cloneTarget, task *types.ManagedObjectReference) {
	clonesInFlight.Lock()
	defer clonesInFlight.Unlock()
	if task == nil {
		delete(clonesInFlight.m, t)
		return
	}
	clonesInFlight.m[t] = task
}

func taskRunning(ref types.ManagedObjectReference) bool {
	task, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok {
		return false
	}
	var state types.TaskInfoState
	simulator.Map.WithLock(task, func() { state = task.Info.State })
	return state == types.TaskInfoStateRunning || state == types.TaskInfoStateQueued
}

// vmNamedIn: the VM of that name directly in the folder, if any.
func vmNamedIn(folder types.ManagedObjectReference, name string) *types.ManagedObjectReference {
	inventoryMu.RLock() // no clone is half-made (see serveLookup)
	defer inventoryMu.RUnlock()
	f, ok := simulator.Map.Get(folder).(*simulator.Folder)
	if !ok {
		return nil
	}
	var children []types.ManagedObjectReference
	simulator.Map.WithLock(f, func() { children = append(children, f.ChildEntity...) })
	for _, child := range children {
		if child.Type != "VirtualMachine" {
			continue
		}
		if vm, ok := simulator.Map.Get(child).(*simulator.VirtualMachine); ok && vm.Name == name {
			c := child
			return &c
		}
	}
	return nil
}

// serveDuplicateClone answers a CloneVM_Task whose target name is taken: a task that fails
// with DuplicateName, as vCenter reports it.
func (h *frontHandler) serveDuplicateClone(w http.ResponseWriter, r *http.Request, req *types.CloneVM_Task, object types.ManagedObjectReference) {
	if !h.checkSession(w, r) {
		return
	}
	name := req.Name
	task := simulator.CreateTask(req.This, "cloneVm", func(*simulator.Task) (types.AnyType, types.BaseMethodFault) {
		return nil, &types.DuplicateName{Name: name, Object: object}
	})
	ref := task.Run()
	var b bytes.Buffer
	b.WriteString(soapEnvelopeHead)
	fmt.Fprintf(&b, `<CloneVM_TaskResponse xmlns="urn:vim25"><returnval type="Task">%s</returnval></CloneVM_TaskResponse>`,
		xmlEscape(ref.Value))
	b.WriteString(soapEnvelopeTail)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(b.Bytes())
}

// checkSession lets vcsim check the caller's session (and apply -delay) with a harmless call
// carrying the same cookies; if the session is not valid, vcsim's answer is sent and false
// returned.
func (h *frontHandler) checkSession(w http.ResponseWriter, r *http.Request) bool {
	probe := r.Clone(r.Context())
	probe.Body = ioutil.NopCloser(strings.NewReader(currentTimeEnvelope))
	probe.ContentLength = int64(len(currentTimeEnvelope))
	rec := httptest.NewRecorder()
	h.next.ServeHTTP(rec, probe)
	if rec.Code == http.StatusOK {
		return true
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
	return false
}

// applyCloneConfig applies what vcsim 0.24 ignores of a clone spec's config: annotation,
// numCPUs, numCoresPerSocket and memoryMB.
func applyCloneConfig(vm *simulator.VirtualMachine, spec *types.VirtualMachineConfigSpec) {
	if spec == nil {
		return
	}
	simulator.Map.WithLock(vm, func() {
		var changes []types.PropertyChange
		if spec.Annotation != "" {
			changes = append(changes,
				types.PropertyChange{Name: "config.annotation", Val: spec.Annotation},
				types.PropertyChange{Name: "summary.config.annotation", Val: spec.Annotation})
		}
		if spec.NumCPUs > 0 {
			changes = append(changes,
				types.PropertyChange{Name: "config.hardware.numCPU", Val: spec.NumCPUs},
				types.PropertyChange{Name: "summary.config.numCpu", Val: spec.NumCPUs})
		}
		if spec.NumCoresPerSocket > 0 {
			changes = append(changes, types.PropertyChange{Name: "config.hardware.numCoresPerSocket", Val: spec.NumCoresPerSocket})
		}
		if spec.MemoryMB > 0 {
			changes = append(changes,
				types.PropertyChange{Name: "config.hardware.memoryMB", Val: int32(spec.MemoryMB)},
				types.PropertyChange{Name: "summary.config.memorySizeMB", Val: int32(spec.MemoryMB)})
		}
		if len(changes) > 0 {
			simulator.Map.Update(vm, changes)
		}
	})
}

var localHostnameRE = regexp.MustCompile(`(?m)^\s*local-hostname\s*:\s*["']?([A-Za-z0-9.-]+)`)

// metadataHostname: local-hostname of the VM's guestinfo.metadata (JSON or YAML; encoding
// none, base64 or gzip+base64), or "".
func metadataHostname(extra []types.BaseOptionValue) string {
	var raw, encoding string
	for _, o := range extra {
		v := o.GetOptionValue()
		s, _ := v.Value.(string)
		switch v.Key {
		case "guestinfo.metadata":
			raw = s
		case "guestinfo.metadata.encoding":
			encoding = s
		}
	}
	if raw == "" {
		return ""
	}
	data := []byte(raw)
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "base64", "b64":
		d, err := base64.StdEncoding.DecodeString(raw)
		if err != nil {
			return ""
		}
		data = d
	case "gzip+base64", "gz+b64":
		d, err := base64.StdEncoding.DecodeString(raw)
		if err != nil {
			return ""
		}
		zr, err := gzip.NewReader(bytes.NewReader(d))
		if err != nil {
			return ""
		}
		if data, err = ioutil.ReadAll(zr); err != nil {
			return ""
		}
	}
	var doc map[string]interface{}
	if json.Unmarshal(data, &doc) == nil {
		if h, ok := doc["local-hostname"].(string); ok {
			return h
		}
		return ""
	}
	if m := localHostnameRE.FindSubmatch(data); m != nil {
		return string(m[1])
	}
	return ""
}
