import json, sys, numpy as np
tot=0; ind=0; ind_sites=0; ind_det=0
for d in sys.argv[1:]:
    truth=json.load(open(f"{d}/region/truth.geojson"))["features"]
    inds=np.array([f["geometry"]["coordinates"] for f in truth if f["properties"].get("industry")]).reshape(-1,2)
    fd=json.load(open(f"{d}/evaluation/false_detections.geojson"))["features"]
    dets=json.load(open(f"{d}/scan/detections.geojson"))["features"]
    def near(lon,lat):
        if not len(inds): return np.zeros(0,bool)
        dx=(inds[:,0]-lon)*111e3*np.cos(np.radians(lat)); dy=(inds[:,1]-lat)*111e3
        return np.hypot(dx,dy)<=1500
    for f in fd:
        p=f["properties"]; lon,lat=p.get("peak_lon"),p.get("peak_lat")
        if lon is None:
            c=np.array(f["geometry"]["coordinates"][0]) if f["geometry"]["type"]=="Polygon" else np.array([f["geometry"]["coordinates"]]); lon,lat=c[:,0].mean(),c[:,1].mean()
        tot+=1; ind+=bool(near(lon,lat).any())
    hit=np.zeros(len(inds),bool)
    for f in dets:
        p=f["properties"]; hit|=near(p["peak_lon"],p["peak_lat"])
    ind_sites+=len(inds); ind_det+=hit.sum()
    print(d.split('/')[-1], len(fd), len(inds))
print("false", tot, "on industry", ind, "| industry sites", ind_sites, "detected", ind_det)
